"""atomate2 flows cached under real workflow managers (FireWorks, jobflow-remote)."""
