"""Parallelism: mesh shapes (`layout`), the logical-axis rules (`rules`), the device mesh (`mesh`)."""
