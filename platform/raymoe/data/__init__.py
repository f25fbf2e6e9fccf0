"""raymoe.data"""
