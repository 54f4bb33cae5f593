"""The local node agent: the kubelet of a few GPU nodes, running each pod's command as a local process.

It registers Nodes with ``nvidia.com/gpu`` capacity and keeps them Ready (status
heartbeats and Leases), provisions PersistentVolumes for claims of the ``local``
StorageClass (a directory per claim under ``<state>/volumes/NS/CLAIM``), and for
every pod bound to its nodes:

* materialises ConfigMap, Secret, downwardAPI, projected and emptyDir volumes in a
  per-pod directory and maps PVCs and hostPaths to their directories;
* runs each container's command (the image is ignored; this Python environment is
  on the PATH) in a mount namespace of its own where every volume is bind-mounted
  at its ``mountPath``, so the process sees the paths a real pod would;
* reports phase, container states, exit codes and the termination message (the
  file named by ``FINETUNE_TERMINATION_LOG``, or the log tail on error);
* honours deletion as a kubelet does: SIGTERM, the grace period, SIGKILL, the final
  status, then the delete with grace 0;
* serves the kubelet API's container logs on loopback (``kubectl logs [-f]``), see
  ``logserver.py``.

One module a concern: ``nodes`` (registration, heartbeats, Leases), ``volumes`` (the
provisioner and each pod's volume contents), ``pods`` (the pod watch, a pod's life and its
status), ``containers`` (one container's process, environment and termination message),
``mounts`` (the host's mount points), ``runs`` (what the agent keeps of a pod it runs);
``node_agent.NodeAgent`` composes them. ``python -m finetune_devcluster.agent`` runs it.
"""
