"""HTTP edge of the gateway: routes, request/response schemas, problem+json translation."""
