"""`ftkit push` and Hub access: stage a run or an export with its model card and upload it (see `ftkit.hub.push`)."""
