"""Tests of the admin console: every page renders, secrets stay secret, list pages stay cheap."""
