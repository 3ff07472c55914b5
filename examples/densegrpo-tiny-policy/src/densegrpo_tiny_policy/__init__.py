"""Two policy plugins: one written from scratch (standalone), one reusing densegrpo's diffusers adapter (adapted)."""
