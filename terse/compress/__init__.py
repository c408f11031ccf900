"""terse.compress"""
