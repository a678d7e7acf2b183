"""Video and camera in, overlay video out, end to end (torch-free; OpenCV from the `video` extra).

`frames` opens a video file or camera for reading and an output video for writing (OpenCV,
imported only here and only when used); `overlay` draws each chosen task's picture beside the
model's input; `pipeline` runs them with an engine, decoding and preprocessing the next frame
while the engine runs the current one, and times every stage.
"""
