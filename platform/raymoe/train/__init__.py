"""raymoe.train"""
