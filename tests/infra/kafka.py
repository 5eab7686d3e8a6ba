"""Kafka (tansu) broker for the test session."""
