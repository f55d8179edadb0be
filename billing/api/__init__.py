"""The management API for billing: prices, usage (read from roll-ups) and monthly statements."""
