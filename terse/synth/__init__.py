"""terse.synth"""
