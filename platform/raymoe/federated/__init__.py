"""Federated fine-tuning across data silos: strategies, robust aggregation, privacy, silo clients.

Silos are Ray actors that read only their own data and return adapter tensors and counts; the
server (the job driver) aggregates with a strategy written as pure functions (Flower's
configure/aggregate design), optionally behind clipping + noise and secure aggregation.
"""
