"""Test plumbing that talks to real things on this machine: cgroups, dockerd, workloads.

Deliberately independent of the ``exporter`` package, so a bug in the code under test cannot
hide itself by also breaking the fixture that checks it.
"""
