"""What the proxy tells: metrics, access and application logs, the ops resources."""
