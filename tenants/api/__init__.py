"""The management API for tenants: tenants, client keys, quotas, access policies, management tokens."""
