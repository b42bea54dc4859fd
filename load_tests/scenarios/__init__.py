"""Locust scenarios against the triage service: steady, burst, soak (one locustfile each; see common.py)."""
