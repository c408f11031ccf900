"""terse.backend.local"""
