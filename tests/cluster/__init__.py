"""Tests of several real processes working as one deployment: PostgreSQL, nginx, triage replicas, listeners."""
