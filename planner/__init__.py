"""Logical plans, optimizer rules, cost model and physical planning for KQL queries."""
