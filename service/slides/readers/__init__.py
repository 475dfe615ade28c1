"""Concrete `SlideReader`s, one per decoding library; `service.slides.open.open_slide` picks one."""
