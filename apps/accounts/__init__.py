"""Accounts: API tokens (several per user, named, hashed, optionally expiring or read-only) and the
staff's management of users through the API."""
