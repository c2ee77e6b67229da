"""recsys.pipelines"""
