"""
The configuration: nginx syntax, directive table and typed model.
"""
