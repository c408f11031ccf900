"""terse.pipelines"""
