"""Tests of the deployment files: Dockerfile, Helm chart, alert rules, dashboard, example Job."""
