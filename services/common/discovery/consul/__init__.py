"""Consul for the compose stack: each service registers itself with a health check, finds its
peers among the instances whose checks pass, and takes the authorization policy from a KV key
watched with blocking queries.  The native stack uses files instead (``discovery.registry``,
``infra/policy.json``); the same ``ServiceRegistry`` and ``PolicySource`` hide the difference.

One module per job: ``settings`` (what the environment says), ``client`` (Consul's HTTP API),
``registry`` (lookups), ``registration`` (this process's own entry) and ``policy_source`` (the KV
watcher and its staleness rules).
"""
