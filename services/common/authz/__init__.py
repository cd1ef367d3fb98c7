"""Authorization by SPIFFE ID: the policy, each decision, and the audit trail."""
