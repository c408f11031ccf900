"""terse.retrieval"""
