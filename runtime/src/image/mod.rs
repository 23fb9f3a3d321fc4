//! Images: references, registry pulls, the content-addressed store, layer snapshots and rootfs mounts.
//!
//! Owned by the image work (issue 2, "Images"). Contract used by the rest of oxlet:
//! - `ImageStore::open(root)`; `ensure(reference, PullPolicy, &PullOptions)` returns an `Image`
//!   (pulling as the policy says); `pull`, `get`, `list`, `remove`, `import`.
//! - `Image { reference, digest, config: oci_spec::image::ImageConfiguration, .. }`.
//! - `mount_rootfs(&image, container_dir)` mounts overlayfs at `container_dir/rootfs` with upper and
//!   work dirs inside `container_dir`; `unmount_rootfs(container_dir)` undoes it (idempotent).
//! - `Error::reason()` gives the kubelet reason: InvalidImageName, ErrImagePull, ErrImageNeverPull,
//!   ImageInspectError.
