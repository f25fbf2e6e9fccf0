"""raymoe.parallel"""
