"""Where services find each other: the file registry and Consul."""
