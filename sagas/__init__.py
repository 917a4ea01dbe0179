"""Saga orchestrators (payments, orders) and the services they drive.

The subscription and marketplace-order sagas (see docs/design.md §3 "Sagas"); the package itself
exports nothing: import its modules.
"""
