"""Dashboard building blocks: services, figure builders and view helpers, testable without Streamlit."""
