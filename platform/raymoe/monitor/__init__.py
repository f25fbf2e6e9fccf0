"""raymoe.monitor"""
