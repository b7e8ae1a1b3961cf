"""Serving: BentoML service, score store, pages, access control, audit, monitoring."""
