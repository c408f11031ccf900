"""terse.organize"""
