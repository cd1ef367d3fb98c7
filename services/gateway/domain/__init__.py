"""Pure rules of the gateway: customer tokens, ownership of accounts, transfer outcomes."""
