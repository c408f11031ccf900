"""terse.backend.local.models"""
