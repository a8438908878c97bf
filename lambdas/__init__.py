"""Code shipped as Lambda assets: `handlers` (thin) over `core` (the domain)."""
