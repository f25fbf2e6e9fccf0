"""raymoe.serve"""
