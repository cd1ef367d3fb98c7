"""The training labs (``ztbank lab NAME``, ``make lab-NAME``, the console's lab buttons): each
one changes the running stack, narrates what it observes and says whether zero trust held.

``registry`` is the one list of them; the labs never import the CLI or the console, which both
read that list."""
