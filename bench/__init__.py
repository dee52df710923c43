"""Tether's benchmark harness: real etcd, real coordinators, simulated fleets on loopback.

Run ``python bench/run.py`` (see bench/README.md). Nothing here is imported by the product.
"""
