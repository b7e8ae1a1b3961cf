"""Federated training with Flower: thin apps over plain, tested modules."""
