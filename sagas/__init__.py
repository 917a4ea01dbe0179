"""Saga orchestrators (payments, orders) and the services they drive.

Empty by design in the walking skeleton: the subscription and marketplace-order sagas arrive
with their issue (see DESIGN.md §3 "Sagas"); nothing here is exported yet.
"""
