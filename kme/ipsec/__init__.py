"""Adapters and configurations for IPsec gateways that take kme keys as RFC 8784 PPKs."""
