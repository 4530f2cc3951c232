"""The shared core: settings, errors, metrics, privacy and Kafka client configuration.

The bottom floor of the house. ``schemas``, ``scoring``, ``streams`` and the tools all
import it; it imports nothing of the project but itself (tests/unit/test_architecture.py).
"""
