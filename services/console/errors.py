"""The console's refusals: each is an HTTP problem (status, title) and leaves nothing started."""

from __future__ import annotations

from services.common.errors import CommonError


class ConsoleError(CommonError):
    """The root of the console's errors; ``status`` is the HTTP answer."""

    status = 500
    title = "Console error"


class UnknownLabError(ConsoleError):
    status = 404
    title = "Unknown lab"


class LabBusyError(ConsoleError):
    status = 409
    title = "A lab is running"


class StackDownError(ConsoleError):
    status = 503
    title = "The stack is down"


class UnknownReportError(ConsoleError):
    status = 404
    title = "Unknown report"


class LabStartError(ConsoleError):
    status = 500
    title = "The lab could not be started"
