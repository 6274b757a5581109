"""
Tests for tlsrelay.
"""
