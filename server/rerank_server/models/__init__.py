"""The models this server serves: name -> spec, row builder, scheduler and replicas."""
