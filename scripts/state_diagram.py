def render_mermaid_blocks(markdown: str) -> str:
    return markdown
