"""The multi-tenant graph IR: nodes tagged with tenants, constants by content, a verifier, and the node builder passes use."""
