"""fedstill's institution side: the ClientApp, teacher training and soft-label answers."""
