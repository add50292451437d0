"""Test-only reference implementations (third-party trainers run as oracles); qflash never imports these."""
